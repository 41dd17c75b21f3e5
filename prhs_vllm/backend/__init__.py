"""The prhs attention backend: one module per platform over shared parts."""
