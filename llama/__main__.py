"""`python -m llama ...` is the `llama` command (under torchrun: `torchrun ... -m llama chat ...`)."""

from .cli.main import main

if __name__ == "__main__":
    main()
