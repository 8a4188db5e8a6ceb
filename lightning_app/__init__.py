"""Entry points: ``python -m lightning_app {fit,validate,test,benchmark} ...``."""
