"""`python -m model.chat`: the terminal chat (model/serve/chat.py); this name stays so the command does."""
from model.command import run_command
from model.serve.chat import main

if __name__ == "__main__":
    run_command(main)
