"""What the app answers with; tests rewrite this line in their copy."""

MARKER = "v1"
