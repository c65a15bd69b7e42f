"""Rules for element-wise activation functions."""
