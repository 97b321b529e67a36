"""Pieces of the scripts that engine tests run in a process of their own (spawned engines need
a main module with the ``__main__`` guard)."""

# prints how many processes this one started are still running (zombies and multiprocessing's
# resource tracker, which lives as long as the process, not counted): 0 once its engines are gone
PRINT_PROCESSES_LEFT = '''
def print_processes_left():
    import psutil

    left = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(c.cmdline()):
                left.append(c.pid)
        except psutil.Error:
            pass
    print("engine processes left:", len(left))
'''
