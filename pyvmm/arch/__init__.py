"""Architecture-specific set-up of guest memory, boot state and firmware tables."""
