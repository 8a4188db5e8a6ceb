"""The method, framework-free: clicks, user simulation, metrics, the network, the interactive
session, test-time adaptation (paper A), prototypes and feature alignment (paper B)."""
