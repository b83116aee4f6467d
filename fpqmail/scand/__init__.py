"""fpqmail-scand, the Mail Scanner daemon, and fpqmail-quarantine, its tool."""
