"""Lightning callbacks: test-time adaptation (a thin wrapper of ``modules.adaptation``), benchmark
recording, run checkpoints and plain-text progress."""
