"""virtio-vsock's transport, host side: the packets (packet.py), one stream's state and credit
(connection.py), and the Unix-socket scheme host programs reach the guest by (muxer.py)."""
