"""Lightning callbacks: benchmark recording (and, later, test-time adaptation)."""
