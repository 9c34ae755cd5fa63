from medveil.cli import app

app()
