"""Transfer engines that move KV blocks between the device and host tiers (CUDA via CuPy, CPU)."""
