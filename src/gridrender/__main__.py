from gridrender.cli import app

app()
