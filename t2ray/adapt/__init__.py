"""Two-pass self-adaptation: dispatch (prompt / classifier), few-shot CEM, token-level routing."""
