"""Fluidity tunnel server and the protocol it shares with the agent and the Lambdas."""

__version__ = "0.1.0"
