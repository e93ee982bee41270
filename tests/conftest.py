import odm_basicsr  # noqa: F401  (compatibility fixes and registration before any basicsr import)
