"""The Linux x86 boot protocol ABI: `struct setup_header` and the zero page (`boot_params`).

Declared as in `<asm/bootparam.h>` (packed); fields pyvmm never touches are padding of the same
size. `tests/unit/loader/test_bootparams.py` checks sizes and offsets against the header.
"""

from __future__ import annotations

from typing import Any

from pyvmm.cdecl import declare

ffi: Any = declare(
    "bootparams",
    """
    struct setup_header {
        uint8_t  setup_sects;
        uint16_t root_flags;
        uint32_t syssize;
        uint16_t ram_size;
        uint16_t vid_mode;
        uint16_t root_dev;
        uint16_t boot_flag;
        uint16_t jump;
        uint32_t header;
        uint16_t version;
        uint32_t realmode_swtch;
        uint16_t start_sys_seg;
        uint16_t kernel_version;
        uint8_t  type_of_loader;
        uint8_t  loadflags;
        uint16_t setup_move_size;
        uint32_t code32_start;
        uint32_t ramdisk_image;
        uint32_t ramdisk_size;
        uint32_t bootsect_kludge;
        uint16_t heap_end_ptr;
        uint8_t  ext_loader_ver;
        uint8_t  ext_loader_type;
        uint32_t cmd_line_ptr;
        uint32_t initrd_addr_max;
        uint32_t kernel_alignment;
        uint8_t  relocatable_kernel;
        uint8_t  min_alignment;
        uint16_t xloadflags;
        uint32_t cmdline_size;
        uint32_t hardware_subarch;
        uint64_t hardware_subarch_data;
        uint32_t payload_offset;
        uint32_t payload_length;
        uint64_t setup_data;
        uint64_t pref_address;
        uint32_t init_size;
        uint32_t handover_offset;
        uint32_t kernel_info_offset;
    };

    struct boot_e820_entry {
        uint64_t addr;
        uint64_t size;
        uint32_t type;
    };

    struct boot_params {
        uint8_t  screen_info[0x40];
        uint8_t  apm_bios_info[0x14];
        uint8_t  _pad2[4];
        uint64_t tboot_addr;
        uint8_t  ist_info[0x10];
        uint64_t acpi_rsdp_addr;
        uint8_t  _pad3[8];
        uint8_t  hd0_info[16];
        uint8_t  hd1_info[16];
        uint8_t  sys_desc_table[0x10];
        uint8_t  olpc_ofw_header[0x10];
        uint32_t ext_ramdisk_image;
        uint32_t ext_ramdisk_size;
        uint32_t ext_cmd_line_ptr;
        uint8_t  _pad4[112];
        uint32_t cc_blob_address;
        uint8_t  edid_info[0x80];
        uint8_t  efi_info[0x20];
        uint32_t alt_mem_k;
        uint32_t scratch;
        uint8_t  e820_entries;
        uint8_t  eddbuf_entries;
        uint8_t  edd_mbr_sig_buf_entries;
        uint8_t  kbd_status;
        uint8_t  secure_boot;
        uint8_t  _pad5[2];
        uint8_t  sentinel;
        uint8_t  _pad6[1];
        struct setup_header hdr;
        uint8_t  _pad7[0x290 - 0x1f1 - 0x7b];
        uint32_t edd_mbr_sig_buffer[16];
        struct boot_e820_entry e820_table[128];
        uint8_t  _pad8[48];
        uint8_t  eddbuf[0x1ec];
        uint8_t  _pad9[276];
    };
    """,
    packed=True,
)

SETUP_HEADER_OFFSET = 0x1F1
ZERO_PAGE_SIZE = 0x1000
E820_MAX_ENTRIES_ZEROPAGE = 128

# setup_header.header: "HdrS"
HDRS_MAGIC = 0x53726448
# setup_header.boot_flag
BOOT_FLAG_MAGIC = 0xAA55
# setup_header.type_of_loader: "undefined" boot loader (0xff) - what crosvm and Firecracker use.
LOADER_TYPE_UNDEFINED = 0xFF
# setup_header.loadflags
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# setup_header.xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
