"""The README's quick start: pick a port, release it, stop."""

from dynamic_port_manager import DynamicPortManager

pm = DynamicPortManager(3000, 9000, json_path="utils/port_state/dynamic_ports_service1.json")
port = pm.pick_port()
print("Selected port:", port)
pm.release_port()
pm.stop()
