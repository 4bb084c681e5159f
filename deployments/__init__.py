"""Ray Serve applications and their configs (Ray appears only here)."""
