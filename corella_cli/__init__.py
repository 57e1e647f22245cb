"""corella's command line: a thin typer app over the library packages."""
