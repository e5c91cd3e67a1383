"""Stage one: corpus -> teacher -> store."""
