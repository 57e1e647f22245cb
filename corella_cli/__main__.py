from corella_cli.main import app

app(prog_name="corella")
