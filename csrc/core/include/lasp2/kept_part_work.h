// Work a backend keeps from one call over a part for a later call over the same part
// within one schedule call (LASP-2: what a part summary walked, for the output pass; what
// the entering-state gradient or the dq pass computed, for the dk/dv pass), and the
// family-side holder that carries it between them.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "lasp2/types.h"

namespace lasp2 {

// Opaque to the families; destroying it gives its memory back (on the device:
// stream-ordered, behind the launches already enqueued that read it).
class KeptPartWork {
 public:
  virtual ~KeptPartWork() = default;
};

// A family's kept work per local part (at most parts_per_rank entries).
class KeptByPart {
 public:
  void put(TokenRange part, std::unique_ptr<KeptPartWork> work) {
    if (work) items_.emplace_back(part, std::move(work));
  }
  // The part's work, no longer held here (null: none kept). The caller keeps it alive
  // until the launches that read it are enqueued.
  std::unique_ptr<KeptPartWork> take(TokenRange part) {
    for (auto it = items_.begin(); it != items_.end(); ++it) {
      if (it->first == part) {
        std::unique_ptr<KeptPartWork> work = std::move(it->second);
        items_.erase(it);
        return work;
      }
    }
    return nullptr;
  }

 private:
  std::vector<std::pair<TokenRange, std::unique_ptr<KeptPartWork>>> items_;
};

}  // namespace lasp2
