"""`python -m llama ...` is the `llama` command (under torchrun: `torchrun ... -m llama chat ...`)."""

import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C before main's own handler exists: the same one line and exit code
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)

if __name__ == "__main__":
    main()
