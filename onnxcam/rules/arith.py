"""Rules for element-wise arithmetic with broadcasting."""
