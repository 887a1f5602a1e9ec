"""x86_64 direct boot: the guest-physical layout, zero page, tables and initial vCPU state."""
