"""hw_bridge/emulators/drive."""
