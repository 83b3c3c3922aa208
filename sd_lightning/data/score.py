"""``python -m sd_lightning.data.score DIR``: how well ``stage=sample``'s demo images follow their
prompts (a module of its own: ``python -m`` on a module its package imports warns)."""

from sd_lightning.data.demo import main

if __name__ == "__main__":
    main()
