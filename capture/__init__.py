"""Packet capture: everything that turns packets on a wire or in a file into frames for ``protocols``.

``bpf``       classic BPF filter programs attached to AF_PACKET sockets (only service TCP reaches Python)
``snooper``   the live AF_PACKET capture on the standby's macvlan (trio)
``pcapfile``  pcap/pcapng file reader (streaming, bounded memory, byte offsets in every error)
``replay``    ``pairproxy replay``: a capture file through the standby's decoder pipeline (offline tool)
"""
