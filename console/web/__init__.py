"""The web console (`cli.py console`): server-rendered pages over the same queries as the CLI,
kept live by one LISTEN connection whose notifications reach browsers as Server-Sent Events."""
