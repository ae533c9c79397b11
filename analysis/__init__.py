"""Research diagnostics built on parcel_jax (not part of the installed package); run from the
repository root as ``python -m analysis.<name>``. See analysis/README.md."""
