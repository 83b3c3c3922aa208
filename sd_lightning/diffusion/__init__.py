"""Diffusion maths as pure functions: noise schedules, prediction targets, samplers."""
