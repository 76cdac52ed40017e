"""leanvm: CoreOS-family test VMs sharing one read-only /usr squashfs."""
