"""`python -m model.serve`: runs model/serve/api.py."""
from model.command import run_command
from model.serve.api import main

run_command(main)
