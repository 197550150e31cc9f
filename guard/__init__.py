"""Guard: call-authorization fraud guard for Asterisk (FastAGI and ARI)."""

__version__ = "0.1.0"
