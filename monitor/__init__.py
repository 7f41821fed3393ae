"""Event intake, bounded state, configuration, CLI and the optional worker plugin."""
