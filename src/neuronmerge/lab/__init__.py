"""Research code (the optional ``lab`` extra): data readers, training, sweeps."""
