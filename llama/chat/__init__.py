"""The chat wing: the interactive chat session, its local tools, the terminal
line reader and dialog files. Never imports the command line."""
