"""device sandbox: the jail and the seccomp filter a device process enters"""
