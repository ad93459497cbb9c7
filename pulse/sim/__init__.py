"""The fleet simulator (`pulse simulate`) and the one-command demo (`pulse demo`)."""
