//! The process's heap (glibc's allocator). A BGP table arrives in bursts: hash tables grow by
//! doubling and forwarding batches come and go, and glibc keeps what was freed inside its
//! heap. Left alone, a node agent that learned 100,000 routes holds twice the memory they
//! need. Two settings fix that; on other C libraries both do nothing.

#[cfg(target_env = "gnu")]
unsafe extern "C" {
    fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    fn malloc_trim(pad: usize) -> std::ffi::c_int;
}

/// Keep large allocations (the tables of whole route tables) in their own mappings, so that a
/// table replaced by its grown copy goes back to the system at once. glibc otherwise raises
/// its threshold to the size of each such block freed, and keeps the next ones in the heap.
pub fn keep_large_allocations_mapped() {
    #[cfg(target_env = "gnu")]
    {
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: a documented tunable, set before or between allocations; no memory is touched.
        unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
    }
}

/// Give the heap's free pages back to the system.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages; live allocations are not affected.
    unsafe {
        malloc_trim(0)
    };
}

/// Counts changes to big tables and gives the free heap back after every `every` of them
/// (a trim walks the heap: once per burst, not per change).
pub struct HeapTrimmer {
    every: usize,
    since: usize,
}

impl HeapTrimmer {
    pub fn new(every: usize) -> HeapTrimmer {
        HeapTrimmer { every, since: 0 }
    }

    pub fn changed(&mut self, n: usize) {
        self.since += n;
        if self.since >= self.every {
            release_free_heap();
            self.since = 0;
        }
    }
}
