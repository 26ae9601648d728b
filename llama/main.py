"""`python -m llama.main ...` is the `llama` command (for torchrun: `torchrun ... -m llama.main chat ...`)."""

from .commands import main

if __name__ == "__main__":
    main()
