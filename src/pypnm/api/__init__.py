"""The HTTP side of pypnm: the app factory, its middleware and one router per area."""
