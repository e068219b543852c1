"""The benchmark: incstore against the monolithic tarball."""
