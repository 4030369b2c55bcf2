"""Reinforcement-learning pieces: rewards, judges and the sandbox that runs model-written code."""
