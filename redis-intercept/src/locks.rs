//! Locks taken with poisoning recovered: every value the proxy guards with a lock is whole
//! whenever a holder could panic, so a panic elsewhere must not take the lock's users down too.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`], taking the data of a poisoned lock as it is.
pub trait LockRecovered<T> {
    /// Locks, recovering from poisoning.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockRecovered<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], taking the data of a poisoned lock as it is.
pub trait RwLockRecovered<T> {
    /// Locks for reading, recovering from poisoning.
    fn read_recovered(&self) -> RwLockReadGuard<'_, T>;
    /// Locks for writing, recovering from poisoning.
    fn write_recovered(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLockRecovered<T> for RwLock<T> {
    fn read_recovered(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_recovered(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = std::sync::Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.locked();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
        let l = RwLock::new(5);
        *l.write_recovered() += 1;
        assert_eq!(*l.read_recovered(), 6);
    }
}
