"""Built-in plugins. They register through the same hooks third-party packages use."""
