"""`python -m model.web`: the web chat (model/serve/web.py); this name stays so the command does."""
from model.command import run_command
from model.serve.web import main

if __name__ == "__main__":
    run_command(main)
