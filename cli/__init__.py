"""nucseg command-line layer (installed as the importable package ``nucseg_cli``)."""
