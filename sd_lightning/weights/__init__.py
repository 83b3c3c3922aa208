"""Stable Diffusion's weights in and out: key tables between our (original) names and diffusers',
configs from diffusers' config.json or from the weights, and readers for single files and
diffusers folders."""
