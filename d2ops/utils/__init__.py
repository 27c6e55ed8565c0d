"""Small helpers every layer may use: device choice (more move here with the layout issue)."""
