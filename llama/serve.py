"""`python -m llama.serve ...` is `llama serve ...` (an OpenAI-compatible HTTP server)."""

import sys

from .commands import main

if __name__ == "__main__":
    main(["serve"] + sys.argv[1:])
