from corella_cli.main import app

if __name__ == "__main__":  # a spawned child process (the LLM's) imports this module too
    app(prog_name="corella")
